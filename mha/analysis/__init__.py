"""Analysing attention heads: what role each plays.

    roles = mha.analysis.head_roles(enc.attentions, enc.tokens)   # [HeadRole(layer, head, role, score)]
"""

from ._roles import ROLES, HeadRole, head_roles, is_punctuation, pick_role, role_scores

__all__ = ["ROLES", "HeadRole", "head_roles", "is_punctuation", "pick_role", "role_scores"]
