"""mmrl.video — see README."""
