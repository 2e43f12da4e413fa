"""The rule engine: typed invertible ops, per-family rule tables, planning and strict coverage."""
