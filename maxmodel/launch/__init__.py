"""`maxmodel launch`: get the same job onto local processes, Cloud TPU VMs, GKE JobSets or Slurm."""
