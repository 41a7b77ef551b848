"""Small builders for the models the tests gate: llm-foundry MPT and a Llama-style HF model."""

from __future__ import annotations

import torch
from llmfoundry.models.hf import ComposerHFCausalLM
from llmfoundry.models.mpt import ComposerMPTCausalLM
from transformers import LlamaConfig

CPU_ATTN = {'attn_impl': 'torch', 'rope': True, 'rope_impl': 'hf'}
SHAPE_130M = dict(d_model=768, n_heads=12, n_layers=12, vocab_size=32000)  # Table 2


def mpt(
    d_model=128,
    n_heads=4,
    n_layers=4,
    vocab_size=512,
    max_seq_len=64,
    kv_n_heads=None,
    ffn_type='mptmlp',
    tie_word_embeddings=False,
    init_device='cpu',
    seed=0,
) -> ComposerMPTCausalLM:
    """A llm-foundry MPT as the paper's models are shaped: RMSNorm, RoPE, no bias, FFN 4d."""
    torch.manual_seed(seed)
    attn = dict(CPU_ATTN)
    if kv_n_heads is not None:
        attn.update(attn_type='grouped_query_attention', kv_n_heads=kv_n_heads)
    ffn = {'ffn_type': ffn_type}
    if ffn_type == 'mptmlp':
        ffn['ffn_act_fn'] = {'name': 'gelu', 'approximate': 'none'}
    return ComposerMPTCausalLM(
        d_model=d_model,
        n_heads=n_heads,
        n_layers=n_layers,
        expansion_ratio=4,
        max_seq_len=max_seq_len,
        vocab_size=vocab_size,
        no_bias=True,
        norm_type='rmsnorm',
        norm_eps=1e-5,
        attn_config=attn,
        ffn_config=ffn,
        tie_word_embeddings=tie_word_embeddings,
        loss_fn='torch_crossentropy',
        init_device=init_device,
    )


def llama_config(
    d_model=128, n_heads=4, kv_heads=2, n_layers=4, vocab_size=512, tie=False, max_positions=128
) -> LlamaConfig:
    """The Hugging Face config of a Llama-style model: GLU FFN of width 4d, GQA."""
    return LlamaConfig(
        hidden_size=d_model,
        intermediate_size=4 * d_model,
        num_attention_heads=n_heads,
        num_key_value_heads=kv_heads,
        num_hidden_layers=n_layers,
        vocab_size=vocab_size,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie,
    )


def llama(tmp_path, d_model=128, n_heads=4, kv_heads=2, n_layers=4, vocab_size=512, tie=False, seed=0):
    """A Llama-style model (GLU FFN, GQA) built through llm-foundry's hf_causal_lm, pretrained: false."""
    torch.manual_seed(seed)
    config = llama_config(d_model, n_heads, kv_heads, n_layers, vocab_size, tie)
    path = tmp_path / 'llama_config'
    config.save_pretrained(path)
    return ComposerHFCausalLM(
        tokenizer=None,
        pretrained_model_name_or_path=str(path),
        pretrained=False,
        use_train_metrics=False,
    )


INIT_SEED = 17  # the algorithms' seed in the distributed-init tests


def mpt_for_init(init_device='cpu') -> ComposerMPTCausalLM:
    """A tiny MPT with GQA (q, k, v slices of two widths) for the init tests."""
    return mpt(d_model=64, n_heads=4, kv_n_heads=2, n_layers=2, vocab_size=256, init_device=init_device)


def _apply_with_seed():
    from wesar_composer import (
        apply_paper_init,
        apply_residual_scaling,
        apply_sigma_reparam,
        apply_weight_norm,
        apply_wesar,
    )

    return {
        'wesar': apply_wesar,
        'paper_init': apply_paper_init,
        'weight_norm': apply_weight_norm,
        'sigma_reparam': apply_sigma_reparam,
        'residual_scaling': apply_residual_scaling,
    }


APPLY_WITH_SEED = _apply_with_seed()
