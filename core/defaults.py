"""The project's own defaults that the flows and the command line share (the seed's values: core/seed.py)."""

# How long a pipeline waits for a training it sent to a work pool: the seed's 2 epochs take minutes
# on a GPU and about 6 minutes on 2 CPU cores, and a queue may hold the run until a worker is free.
TRAIN_TIMEOUT_SECONDS = 6 * 3600

# How long a command waits for Prefect's embedded API to start (Prefect's own default: 20 s). On a 2-core
# machine running one other job, or in a new Prefect home whose database is created and migrated first,
# the start took longer than 20 s nine times in one afternoon; a first `notmnist iris` took 81 s in all.
EPHEMERAL_API_STARTUP_SECONDS = 180

# A download attempt that receives nothing for this long ends; the next attempt resumes the `.part`.
READ_TIMEOUT_SECONDS = 30.0

# What the splits stage's duplicate control lets repeat by default (the choices: core/parameters.py).
DEDUP = "cross-split"
