"""mmrl.diffusion — see README."""
