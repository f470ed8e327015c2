"""The switchboard: users, tokens, hosts, images catalogue, jobs and scheduling."""
