"""Fetching models from the network: HTTP(S) with urllib3, Hub URLs with huggingface_hub.

`transport` opens one connection pool per download setting (timeouts, CA bundle,
proxies from the environment, netrc credentials) and classifies what went wrong;
`hub` turns an `hf://` source into a URL, headers and the Hub's metadata;
`stream` writes a body into a file descriptor the caller owns, resuming with
`Range` after a drop. Nothing here knows the model dir's layout or logs: the
caller (`ocrd.act.fetching`) names the file, hashes what lands, and logs.
urllib3 and huggingface_hub are imported only once a remote source is fetched.
"""
