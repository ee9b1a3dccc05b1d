"""Evaluation: ALBEF-protocol retrieval (``retrieval``) and the diagnostics that say
whether the fused model uses both modalities (``diagnostics``)."""
