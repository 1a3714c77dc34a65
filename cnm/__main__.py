from cnm.cli import main

main()
