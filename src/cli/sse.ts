/**
 * The events of a Server-Sent Events body, in order: each block's `event:` (default `message`) and its
 * `data:` lines joined by newlines. Blocks without data (comments, keep-alives) are not events, as in the
 * EventSource standard.
 */
export async function* sseEvents(body: AsyncIterable<Uint8Array>): AsyncGenerator<{ event: string; data: string }> {
  const decoder = new TextDecoder()
  let buffer = ''
  for await (const chunk of body) {
    buffer += decoder.decode(chunk, { stream: true })
    let end: number
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const block = buffer.slice(0, end)
      buffer = buffer.slice(end + 2)
      const lines = block.split('\n')
      const data = lines.filter((l) => l.startsWith('data: ')).map((l) => l.slice(6))
      if (data.length === 0) continue
      yield { event: /^event: (.*)$/m.exec(block)?.[1] ?? 'message', data: data.join('\n') }
    }
  }
}
