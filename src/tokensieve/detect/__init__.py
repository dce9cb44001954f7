"""Object detection on the scene generator: a tiny stock YOLOS detector and BAViT, a background-aware
token classifier that drops background patches before the detector (:mod:`.bavit`)."""
