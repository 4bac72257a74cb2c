"""The one tolerance helper: an output must be at most 2x as far from the float64 truth as a baseline."""

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative RMS error ||out - ref|| / ||ref||, computed in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_close_to_ref(name: str, out: torch.Tensor, ref64: torch.Tensor, baseline: torch.Tensor | None = None,
                        rtol: float = 1e-5, atol: float = 1e-12, slack: float = 0.0) -> None:
    """Pass when out's error vs ref64 is within 2x baseline's error plus `slack` (or `rtol` without a baseline),
    or its largest absolute error is within atol."""
    err = rel_err(out, ref64)
    limit = rtol if baseline is None else 2.0 * rel_err(baseline, ref64) + slack
    abs_err = (out.double() - ref64.double()).abs().max().item()
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    assert err <= limit or abs_err <= atol, f"{name}: rel RMS {err:.3e} > limit {limit:.3e} (max abs {abs_err:.3e})"
