"""What every layer may use: one-line user errors, and facts about the machine."""
