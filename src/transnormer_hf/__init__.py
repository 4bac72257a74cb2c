"""transnormer-hf: TransNormerLLM (Lightning Attention) as a native transformers model.

Importing this package registers `TransNormerLLMConfig`, `TransNormerLLMModel` and
`TransNormerLLMForCausalLM` with the transformers Auto* classes (model_type "transnormer_llm").
That registration is the package's only import side effect.
"""

from __future__ import annotations

import logging

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .cache_transnormer import TransNormerLLMCache, TransNormerLLMStaticCache
from .configuration_transnormer import PRESETS, TransNormerLLMConfig
from .modeling_transnormer import (
    TransNormerLLMForCausalLM,
    TransNormerLLMModel,
    TransNormerLLMPreTrainedModel,
)

__version__ = "0.1.0"
__all__ = [
    "PRESETS",
    "TransNormerLLMCache",
    "TransNormerLLMConfig",
    "TransNormerLLMForCausalLM",
    "TransNormerLLMModel",
    "TransNormerLLMPreTrainedModel",
    "TransNormerLLMStaticCache",
]

logger = logging.getLogger(__name__)


def _register_auto_classes() -> bool:
    """Register with the Auto* classes unless another class already owns our model_type (then warn)."""
    model_type = TransNormerLLMConfig.model_type
    if model_type in CONFIG_MAPPING and CONFIG_MAPPING[model_type] is not TransNormerLLMConfig:
        logger.warning(
            "model_type %r is already registered to %s; transnormer_hf did not register its Auto classes. "
            "Use TransNormerLLMForCausalLM.from_pretrained directly.", model_type, CONFIG_MAPPING[model_type],
        )
        return False
    AutoConfig.register(model_type, TransNormerLLMConfig, exist_ok=True)
    AutoModel.register(TransNormerLLMConfig, TransNormerLLMModel, exist_ok=True)
    AutoModelForCausalLM.register(TransNormerLLMConfig, TransNormerLLMForCausalLM, exist_ok=True)
    # Trainer (5.x) shifts the labels for label smoothing only for class names in this public table of causal LMs,
    # which register() leaves alone; without it, label_smoothing_factor > 0 trained on unshifted labels.
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault(model_type, TransNormerLLMForCausalLM.__name__)
    return True


# LoRA's default targets for our model_type, so `LoraConfig(task_type="CAUSAL_LM")` needs no target_modules.
# The fused qkvu_proj adapts q, k, v and the gate u together.
LORA_TARGET_MODULES = ["qkvu_proj", "out_proj", "l1", "l2", "l3"]


def _register_peft_target_modules() -> None:
    """Add our model_type to peft's default LoRA target table (a plain dict peft reads by reference)."""
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as lora_targets
    except ImportError:  # peft is optional at runtime; the table is not a public API either
        return
    lora_targets.setdefault(TransNormerLLMConfig.model_type, LORA_TARGET_MODULES)


_register_auto_classes()
_register_peft_target_modules()
