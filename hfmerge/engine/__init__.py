"""Reading, planning, executing and writing merges."""
