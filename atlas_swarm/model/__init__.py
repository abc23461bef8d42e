"""Base model + PEFT LoRA adapter: loading (hub name or local folder), saving as a stock PEFT folder, hashing."""
