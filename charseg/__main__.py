from charseg.cli import main

main()
