class LaunchError(ValueError):
    """Bad launch input (a flag, a TPU type, a mesh that does not fit). The CLI prints it and exits 2."""
