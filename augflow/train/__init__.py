"""Training: one loop (:mod:`augflow.train.loop`) for every family, run by a plain or a private session
(:mod:`augflow.train.session`, :mod:`augflow.train.privacy`), its recipe (:mod:`augflow.train.recipe`), resumable
checkpoints, and the training of latent MedSymmFlow's autoencoder (:mod:`augflow.train.autoencoder`)."""
