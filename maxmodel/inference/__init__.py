"""Generation: sampling, incremental detokenization and (beside them) the decode engine and server."""
