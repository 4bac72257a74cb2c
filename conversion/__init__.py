def hello(): return "c"
