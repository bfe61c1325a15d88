"""Where base models come from and how they load."""
