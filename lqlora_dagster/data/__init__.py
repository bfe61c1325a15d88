"""Real text for calibration, finetuning and evaluation, from installed packages."""
