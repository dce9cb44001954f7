"""Token pruning inside a video ViT: a tiny stock ``VideoMAEForVideoClassification`` trained by the project
on the synthetic ``change`` clips (:mod:`.data`, :mod:`.model`, :mod:`.train`), and STA (Ding et al.,
ICCV 2023; :mod:`.sta`) against ToMe (:mod:`.tome`) and random drop in the same blocks at equal FLOPs
(:mod:`.prune`, :mod:`.evaluate`)."""
