"""Medical semantics of a head volume: multi-scale feature encoders (``semid.semantics.encoders``).

The features feed the decoupling (identity removed per feature level) and the compensation generator
of the pipeline (DESIGN.md §4, steps 4-6). Encoders are pluggable: a small CNN trained here on phantoms
with medical pretext tasks (not a foundation model), and adapters for real medical foundation-model
checkpoints loaded from a local path (nothing is ever downloaded).
"""
