"""Adapters: LoRA (kohya / LyCORIS LoCon / diffusers / PEFT files) and textual-inversion embeddings.

    lora.py               the LoRA layer (y = W x + scale · B(A x)), attaching, fusing, removing
    formats.py            LoRA files of every format -> one canonical form keyed by minidepth's layer names
    textual_inversion.py  embedding files, new tokens, the bigger token embedding
    pipeline.py           the pipeline methods (diffusers' names): load_lora_weights, set_adapters, fuse_lora, ...
"""
