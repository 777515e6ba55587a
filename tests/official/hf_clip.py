"""A small transformers ``CLIPModel`` with random weights, its state dict as NumPy and in the
OpenAI/open_clip layout: the reference the CLIP converter tests share (needs the convert extra)."""

import numpy as np
import torch
from transformers import CLIPConfig, CLIPModel

VOCAB = 100

# Widths are multiples of 64 so that OpenAI's head rule (width // 64) gives the same heads.
SMALL = dict(
    projection_dim=48,
    vision_config=dict(
        hidden_size=192,
        intermediate_size=384,
        num_hidden_layers=3,
        num_attention_heads=3,
        patch_size=4,
        image_size=16,
        projection_dim=48,
    ),
    text_config=dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=2,
        max_position_embeddings=16,
        vocab_size=VOCAB,
        bos_token_id=VOCAB - 2,
        eos_token_id=VOCAB - 1,
        pad_token_id=0,
        projection_dim=48,
    ),
)


def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial values everywhere (transformers initialises LayerNorms to 1/0, biases to 0),
    scaled so that activations stay O(1), as in a trained CLIP's first layers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif p.ndim >= 2 and "embedding" not in name:
                p.copy_(0.5 * noise / np.sqrt(np.prod(p.shape[1:])))
            else:
                p.copy_(0.1 * noise)
    return model.eval()


def hf_to_openai(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tests' own transformers -> OpenAI key mapping (the inverse of the converter's)."""
    out = {}
    for tower, prefix in (("vision_model", "visual.transformer"), ("text_model", "transformer")):
        layers = {k.split(".")[3] for k in state if k.startswith(f"{tower}.encoder.layers.")}
        for i in layers:
            hf, oa = f"{tower}.encoder.layers.{i}", f"{prefix}.resblocks.{i}"
            for kind in ("weight", "bias"):
                out[f"{oa}.attn.in_proj_{kind}"] = np.concatenate(
                    [state[f"{hf}.self_attn.{n}_proj.{kind}"] for n in "qkv"], axis=0
                )
                out[f"{oa}.attn.out_proj.{kind}"] = state[f"{hf}.self_attn.out_proj.{kind}"]
                out[f"{oa}.ln_1.{kind}"] = state[f"{hf}.layer_norm1.{kind}"]
                out[f"{oa}.ln_2.{kind}"] = state[f"{hf}.layer_norm2.{kind}"]
                out[f"{oa}.mlp.c_fc.{kind}"] = state[f"{hf}.mlp.fc1.{kind}"]
                out[f"{oa}.mlp.c_proj.{kind}"] = state[f"{hf}.mlp.fc2.{kind}"]
    emb = "vision_model.embeddings"
    out["visual.conv1.weight"] = state[f"{emb}.patch_embedding.weight"]
    out["visual.class_embedding"] = state[f"{emb}.class_embedding"]
    out["visual.positional_embedding"] = state[f"{emb}.position_embedding.weight"]
    out["visual.proj"] = state["visual_projection.weight"].T
    out["token_embedding.weight"] = state["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = state["text_model.embeddings.position_embedding.weight"]
    out["text_projection"] = state["text_projection.weight"].T
    out["logit_scale"] = state["logit_scale"]
    for kind in ("weight", "bias"):
        out[f"visual.ln_pre.{kind}"] = state[f"vision_model.pre_layrnorm.{kind}"]
        out[f"visual.ln_post.{kind}"] = state[f"vision_model.post_layernorm.{kind}"]
        out[f"ln_final.{kind}"] = state[f"text_model.final_layer_norm.{kind}"]
    # What OpenAI's TorchScript archives also carry.
    out["input_resolution"] = np.asarray(16)
    out["context_length"] = np.asarray(16)
    out["vocab_size"] = np.asarray(VOCAB)
    return out


def numpy_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def small_clip() -> CLIPModel:
    """``SMALL`` with random non-trivial weights (seed 0), eager attention."""
    config = CLIPConfig(**SMALL)
    return randomise(CLIPModel._from_config(config, attn_implementation="eager"), seed=0)
