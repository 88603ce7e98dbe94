"""Reports and plots: what turns labels and probabilities into files people read or look at."""
