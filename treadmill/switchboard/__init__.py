"""The switchboard: users, tokens, hosts, images catalogue, jobs and scheduling.

- ``tap`` (options, ``makeService``), ``settings`` (the settings of ``settings.toml``,
  which ``tap`` and the config classes are made from), ``service`` (the service tree), ``manhole``
  (operator helpers), ``metrics``, ``bootstrap`` (the first admin), ``migrate``
  (migrations from the command line);
- ``api/`` (the HTTP API, one module per domain), ``schemas`` (request JSON Schemas),
  ``views`` (response shapes), ``openapi`` (the OpenAPI document), ``auth`` (bearer
  tokens, passwords), ``credentials`` (token and password hashing), ``access``
  (privileges), ``repositories`` (the registry token policy), ``audit`` (the audit
  log's records);
- ``store/`` (all SQL, one component per domain), ``database`` (pool, migrations,
  LISTEN), ``migrations/*.sql``, ``notifications`` (the NOTIFY payloads);
- ``jobstate`` (the job state machine, whose fault a job's end is), ``scheduler`` and
  ``scheduling`` (assigning jobs to hosts), ``timeouts`` (deadlines), ``events`` (live
  job events), ``health`` (host health decisions) and ``healthwork`` (the leader's
  health pass: checks due by the clock, queued jobs' messages);
- ``links`` (the supervisors' WebSocket sessions), ``admission`` (at most so many
  link handshakes under way, beyond them a FIFO queue, beyond that 503),
  ``registrar`` (link registrations and ends written in batches), ``batching`` (the
  calls arriving together as one statement: ``Batcher``), ``reconcile`` (what a link does
  about a host's report), ``jobstart`` (the wire ``JobStart``), ``renewal`` (an extended
  job's fresh tokens, ``renew_tokens``), ``holds`` (ending
  a failed job's held host), ``instances`` (liveness of switchboard instances, the
  leader);
- ``web`` (the web console: its assets at ``/``, cookie sessions).
"""
