class ConfigError(ValueError):
    """A bad key or value. `key` is the dotted key at fault; the CLI exits 2 with the message."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config key '{key}': {message}" if key else message)
