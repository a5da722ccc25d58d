"""Peak GPU memory of training a Llama-1B-shaped model: full bf16 fine-tuning vs QLoRA (unipelt preset `qlora`).

Needs CUDA (exits with a message otherwise). Random weights from a config (nothing is downloaded); a few steps
of batch 4 × 512 tokens. Run: python benchmarks/qlora_memory.py [--steps 3] [--seq 512] [--batch 4]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys

import torch


def llama_1b_config():
    from transformers import LlamaConfig

    # Llama-3.2-1B's shape: 16 layers, d = 2048, 32 heads / 8 KV heads, FFN 8192, vocabulary 128256.
    return LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                       intermediate_size=8192, vocab_size=128256, max_position_embeddings=2048,
                       tie_word_embeddings=True)


def measure(method: str | None, steps: int, batch: int, seq: int) -> dict:
    from transformers import AutoModelForCausalLM

    import unipelt

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(llama_1b_config(), torch_dtype=torch.bfloat16).cuda()
    if method is not None:
        unipelt.attach(model, method)
    spec_optimizer = unipelt.load_method(method).optimizer if method else "adamw"
    params = [p for p in model.parameters() if p.requires_grad]
    if spec_optimizer == "paged_adamw_8bit":
        import bitsandbytes as bnb

        optimizer = bnb.optim.PagedAdamW8bit(params, lr=1e-4)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-5)
    after_load = torch.cuda.memory_allocated()
    ids = torch.randint(0, 128256, (batch, seq), device="cuda")
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    result = {"method": method or "full_bf16", "weights_gib": after_load / 2**30,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
              "trainable": sum(p.numel() for p in params), "loss": float(loss)}
    del model, optimizer, params
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("qlora_memory: needs a CUDA GPU (bitsandbytes' 4-bit kernels and paged optimizers)")
    for method in (None, "qlora"):
        print(json.dumps(measure(method, args.steps, args.batch, args.seq)))


if __name__ == "__main__":
    main()
