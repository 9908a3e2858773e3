"""Training drafters: one loop (`loop.train`) with a pluggable objective (`objectives`), checkpoints that resume
bitwise (`checkpoints`), the data every recipe shares (`data`), the losses and KOALA's adversarial term, and the
recipes `koala pretrain`, `koala distill` and `koala heads` run (`recipes`). Nothing here imports MLflow or Prefect."""
