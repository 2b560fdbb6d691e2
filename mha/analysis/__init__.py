"""Analysing attention heads: what role each plays.

    roles = mha.analysis.head_roles(enc.attentions, enc.tokens)   # [HeadRole(layer, head, role, score)]
    imp = mha.analysis.ablation_importance(model)                  # (layers, heads)
    steps = mha.analysis.pruning_curve(model, mha.analysis.order_by(imp))
"""

from ._importance import (PruneStep, ablation_importance, gradient_importance, order_by, paraphrase_pairs,
                          pruning_curve, sentences, spearman)
from ._roles import ROLES, RULE, HeadRole, head_roles, is_punctuation, pick_role, role_scores

__all__ = ["PruneStep", "ablation_importance", "gradient_importance", "order_by", "paraphrase_pairs",
           "pruning_curve", "sentences", "spearman",
           "ROLES", "RULE", "HeadRole", "head_roles", "is_punctuation", "pick_role", "role_scores"]
