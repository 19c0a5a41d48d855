from ocrd.cli import main

main()
