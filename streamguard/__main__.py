from streamguard.cli import main

main()
