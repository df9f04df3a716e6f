# Makes the Hydra configs importable as conceptkit.conf (found by installed packages too).
