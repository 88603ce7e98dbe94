"""`python -m cellcls.bench`."""

from cellcls.bench import main

main()
