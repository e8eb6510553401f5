"""python -m edgeqwen.cli"""
from . import main

main()
