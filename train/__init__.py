"""The minimal LoRA trainer (installed as `gptoss.train`)."""
