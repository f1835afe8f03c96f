"""Extra networks, the files A1111 users add to a checkpoint: LoRA / LyCORIS, textual-inversion embeddings, VAEs.

Data flow: folders (where the files are) -> files (read, hash, group keys by module) -> algorithms (each
module's weight delta) -> keys (file module names -> the loaded model's modules) -> apply (merge into the
weights, keep the originals, restore bit for bit) ; prompt tags (`<lora:name:te:unet>`) pick which ones a job
uses; embeddings plug into tokenization; vae swaps the VAE weights.
"""
