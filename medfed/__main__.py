from medfed.cli import main

main()
