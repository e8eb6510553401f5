"""python -m edgeqwen"""
from .cli import main

main()
