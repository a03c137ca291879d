"""mmrl.rewards — see README."""
