"""Training: one loop (:mod:`augflow.train.loop`), atomic and resumable checkpoints, and differentially private
training with its privacy ledger (:mod:`augflow.train.privacy`)."""
