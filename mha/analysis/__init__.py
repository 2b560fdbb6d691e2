"""Analysing attention heads: what role each plays, words, rollout, corpus statistics.

    roles = mha.analysis.head_roles(enc.attentions, enc.tokens)   # [HeadRole(layer, head, role, score)]
    word_att, words = mha.analysis.to_words(enc.attentions, enc.tokens)   # WordPiece pieces merged
    R = mha.analysis.rollout(enc.attentions)                       # (layers, L, L), residual 0.5
    stats = mha.analysis.corpus_roles(atts, toks)                  # role, score, chance, 95% interval
    imp = mha.analysis.ablation_importance(model)                  # (layers, heads)
    ind = mha.analysis.induction_scores(atts, ids)                 # (layers, heads), Olsson et al.
    table = mha.analysis.decoder_roles(model)                      # decoders: roles vs chance, per head and KV group
    steps = mha.analysis.pruning_curve(model, mha.analysis.order_by(imp))
"""

from ._corpus import CorpusRole, corpus, corpus_roles
from ._decoder_roles import DECODER_ROLES, DecoderRole, RoleTable, decoder_roles, head_roles
from ._induction import induction_scores, repeated_tokens
from ._importance import (PruneStep, ablation_importance, gradient_importance, order_by, paraphrase_pairs,
                          pruning_curve, sentences, spearman)
from ._roles import GLOSSARY, ROLES, RULE, HeadRole, is_punctuation, pick_role, role_score_array, role_scores
from ._rollout import rollout
from ._words import to_words, word_spans

__all__ = ["PruneStep", "ablation_importance", "gradient_importance", "order_by", "paraphrase_pairs",
           "pruning_curve", "sentences", "spearman",
           "GLOSSARY", "ROLES", "RULE", "HeadRole", "head_roles", "is_punctuation", "pick_role", "role_score_array",
           "role_scores", "CorpusRole", "corpus", "corpus_roles", "rollout", "to_words", "word_spans",
           "induction_scores", "repeated_tokens", "DECODER_ROLES", "DecoderRole", "RoleTable", "decoder_roles"]
