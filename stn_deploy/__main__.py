from stn_deploy.cli import main

main()
