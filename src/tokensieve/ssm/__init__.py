"""Token pruning in a vision state-space model: a tiny Vim-style classifier built from transformers'
Mamba mixers (:mod:`.model`), trained by the project (:mod:`.train`), and ToP's pruning
(:mod:`.prune`, Zhan et al., NeurIPS 2024) against ViT-style baselines at equal FLOPs (:mod:`.evaluate`)."""
