"""Engine integrations: the vLLM worker extension (``vllm``) and SGLang's expert-location files (``sglang``)."""
