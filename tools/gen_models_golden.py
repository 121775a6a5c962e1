"""Generates the parity goldens of ponderttt-models from HF transformers (PyTorch).

Writes tiny random GPT-2 and Gemma 3 checkpoints as HF directories (config.json + model.safetensors) into
packages/ponderttt-models/tests/data/<name>/ together with golden.npz: the HF logits and per-layer hidden
states of a fixed batch, and the logits of a left-padded batch. Every norm weight and bias is perturbed away
from its initial value so that a convention error (1 + w, a missing bias) cannot hide behind zeros and ones.

Needs torch and transformers (not dependencies of any package; the tests read only the written files):
    pip install torch transformers
    python tools/gen_models_golden.py

`--check-export` instead checks `ponderttt.models.save_hf_causal_lm` against transformers: the workspace's
Python (`--jax-python`, default `uv run python`) loads every fixture, saves it again with save_hf_causal_lm
(one file, and bf16 in several files with an index) and writes its own logits; transformers then loads each
saved directory with AutoModelForCausalLM and its logits must equal the golden ones (1e-4; bf16 1e-1).
    python tools/gen_models_golden.py --check-export
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import shutil
import subprocess
import tempfile

import numpy as np
import torch
import transformers

OUT = pathlib.Path(__file__).resolve().parents[1] / "packages" / "ponderttt-models" / "tests" / "data"
SEQ_LEN = 13
BATCH = 2


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Adds noise to every 1-D parameter (norm weights, biases) so none keeps its init value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))


def gpt2_model() -> tuple[str, torch.nn.Module]:
    cfg = transformers.GPT2Config(
        vocab_size=97, n_positions=32, n_embd=30, n_layer=2, n_head=3, n_inner=46, tie_word_embeddings=True
    )
    return "gpt2_tiny", transformers.GPT2LMHeadModel(cfg)


def gemma_model(tied: bool) -> tuple[str, torch.nn.Module]:
    cfg = transformers.Gemma3TextConfig(
        vocab_size=101,
        hidden_size=36,
        intermediate_size=50,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=10,
        query_pre_attn_scalar=20,
        sliding_window=5,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        max_position_embeddings=64,
        attn_logit_softcapping=7.0 if tied else None,
        final_logit_softcapping=3.0 if tied else None,
        tie_word_embeddings=tied,
        pad_token_id=0,
    )
    return ("gemma3_tiny" if tied else "gemma3_untied"), transformers.Gemma3ForCausalLM(cfg)


def blocks_and_ends(name: str, model) -> tuple[torch.nn.Module, list[torch.nn.Module], torch.nn.Module]:
    if name.startswith("gpt2"):
        return model.transformer.drop, list(model.transformer.h), model.transformer.ln_f
    return model.model.embed_tokens, list(model.model.layers), model.model.norm


def run(name: str, model, seed: int) -> dict[str, np.ndarray]:
    model.eval()
    start, blocks, end = blocks_and_ends(name, model)
    captured: list[torch.Tensor] = []

    def grab(_module, _inputs, output):
        captured.append((output[0] if isinstance(output, tuple) else output).detach().clone())

    hooks = [m.register_forward_hook(grab) for m in [start, *blocks, end]]
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (BATCH, SEQ_LEN), generator=gen)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    for h in hooks:
        h.remove()

    # Left-padded batch: row 0 has 4 pads, row 1 none; positions count real tokens only.
    mask = torch.ones((BATCH, SEQ_LEN), dtype=torch.long)
    mask[0, :4] = 0
    padded = ids.clone()
    padded[0, :4] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        padded_logits = model(input_ids=padded, attention_mask=mask, position_ids=positions).logits
    out = {
        "input_ids": ids.numpy().astype(np.int32),
        "logits": logits.numpy().astype(np.float32),
        "padded_input_ids": padded.numpy().astype(np.int32),
        "padded_mask": mask.numpy().astype(np.int32),
        "padded_logits": padded_logits.numpy().astype(np.float32),
    }
    for i, h in enumerate(captured):
        out[f"hidden_{i}"] = h.numpy().astype(np.float32)
    return out


def write(name: str, model, seed: int) -> None:
    folder = OUT / name
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(folder, safe_serialization=True)
    for extra in folder.iterdir():
        if extra.name not in ("config.json", "model.safetensors"):
            extra.unlink()
    golden = run(name, model, seed)
    np.savez_compressed(folder / "golden.npz", **golden)
    meta = {"torch": torch.__version__, "transformers": transformers.__version__, "seed": seed}
    (folder / "golden_versions.json").write_text(json.dumps(meta, indent=1) + "\n")
    size = sum(f.stat().st_size for f in folder.iterdir())
    print(f"{name}: {size / 1024:.1f} KiB in {folder}")


# Run by --jax-python: loads each fixture with ponderttt.models and saves it back with save_hf_causal_lm.
EXPORT_SOURCE = """
import sys, pathlib
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
from ponderttt.models import load_hf_causal_lm, save_hf_causal_lm
data, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
for name in sys.argv[3:]:
    model = load_hf_causal_lm(data / name)
    save_hf_causal_lm(model, out / name, config={"pad_token_id": 0})
    save_hf_causal_lm(model, out / (name + "_bf16"), dtype=jnp.bfloat16, max_shard_bytes=8000)
    ids = np.load(data / name / "golden.npz")["input_ids"]
    np.save(out / (name + "_ours.npy"), np.asarray(model(ids).logits))
    print(name, "saved", flush=True)
"""


def check_export(jax_python: str) -> int:
    """Saves every fixture with save_hf_causal_lm (in `jax_python`) and loads the result with transformers."""
    names = ["gpt2_tiny", "gemma3_tiny", "gemma3_untied"]
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        command = [*shlex.split(jax_python), "-c", EXPORT_SOURCE, str(OUT), tmp, *names]
        subprocess.run(command, check=True, cwd=OUT.parents[3])
        for name in names:
            golden = np.load(OUT / name / "golden.npz")
            ids = torch.from_numpy(golden["input_ids"].astype(np.int64))
            for suffix, tol in (("", 1e-4), ("_bf16", 1e-1)):
                folder = pathlib.Path(tmp) / (name + suffix)
                model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
                with torch.no_grad():
                    logits = model(input_ids=ids).logits.numpy()
                diff = float(np.abs(logits - golden["logits"]).max())
                ours = float(np.abs(logits - np.load(pathlib.Path(tmp) / f"{name}_ours.npy")).max())
                ok = diff <= tol
                failures += not ok
                files = sorted(p.name for p in folder.iterdir())
                print(json.dumps({"check": "export", "fixture": name + suffix, "hf_class": type(model).__name__,
                                  "max_diff_to_golden": diff, "max_diff_to_ponderttt": ours, "tolerance": tol,
                                  "ok": ok, "files": files}))
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check-export", action="store_true", help="check save_hf_causal_lm against transformers")
    parser.add_argument("--jax-python", default="uv run python", help="command running the workspace's Python")
    args = parser.parse_args()
    torch.set_default_dtype(torch.float32)
    if args.check_export:
        raise SystemExit(1 if check_export(args.jax_python) else 0)
    for seed, build in enumerate([gpt2_model, lambda: gemma_model(True), lambda: gemma_model(False)]):
        torch.manual_seed(100 + seed)
        name, model = build()
        perturb(model, 200 + seed)
        model.config._attn_implementation = "eager"
        write(name, model, 300 + seed)


if __name__ == "__main__":
    main()
