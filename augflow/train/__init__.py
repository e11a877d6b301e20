"""Training: one loop (:mod:`augflow.train.loop`) and atomic, resumable checkpoints."""
