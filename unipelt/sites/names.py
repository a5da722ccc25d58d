"""The vocabulary of the `at` axis: every site name a method may use, in groups the forms declare against.

Which of these a model has, and where, is the family table's business (table.py); this is only the grammar.
"""

from __future__ import annotations

ATTN_SITES = ("attn.q", "attn.k", "attn.v", "attn.o", "attn", "attn.heads")
CROSS_SITES = tuple(s.replace("attn", "cross_attn", 1) for s in ATTN_SITES)
# ffn.act: the FFN's hidden activation (the input of ffn.down), where (IA)³ rescales the FFN.
FFN_SITES = ("ffn.up", "ffn.gate", "ffn.down", "ffn.act", "ffn")
# AdapterHub's Pfeiffer placement (UniPELT's adapter uses it): post-LN layers (BERT, BART): Δ reads LN(h + residual)
# and is added before that LayerNorm, which is applied again; pre-LN layers: Δ reads h + residual and is added to it.
NORM_SITES = ("ffn.ln",)
SITES = ATTN_SITES + CROSS_SITES + FFN_SITES + NORM_SITES
HEAD_SITES = ("attn.heads", "cross_attn.heads")
# Projection sites are single linear maps, so a linear parallel module there can be folded into the weight.
PROJECTION_SITES = tuple(s for s in SITES if s.rpartition(".")[2] in ("q", "k", "v", "o", "up", "gate", "down"))
# Activation sites: the input of a projection (a rescaling there folds into that projection's columns).
ACTIVATION_SITES = ("ffn.act",)
# The input sequence itself: where prompt tuning / P-tuning put their virtual tokens.
INPUT_SITES = ("embeddings",)
# `at: all_linear` (QLoRA's "all linear layers"): every projection site the model has, expanded per model.
ALL_LINEAR = "all_linear"
ALL_AT = SITES + INPUT_SITES + (ALL_LINEAR,)
STACKS = ("encoder", "decoder")

__all__ = ["ACTIVATION_SITES", "ALL_AT", "ALL_LINEAR", "ATTN_SITES", "CROSS_SITES", "FFN_SITES", "HEAD_SITES",
           "INPUT_SITES", "NORM_SITES", "PROJECTION_SITES", "SITES", "STACKS"]
