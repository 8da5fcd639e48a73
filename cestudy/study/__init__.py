"""Studies: TOML specs -> cells -> kernels + oracle -> metrics -> SQLite store."""
