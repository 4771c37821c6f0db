import { z } from 'zod'

/**
 * What compute costs, per instance type: a price per CPU-hour and per GPU-hour of device time, in USD.
 * Cloud instances (`aws`) cost what we pay for them; contributed devices (`user`) are cheaper. Usage whose
 * instance type is not recorded (`unknown`) is priced as `aws`. PRICE_TABLE replaces the defaults.
 */
export const PriceTable = z.strictObject({
  currency: z.string().length(3).default('USD'),
  aws: z.strictObject({ cpu_hour: z.number().min(0), gpu_hour: z.number().min(0) }),
  user: z.strictObject({ cpu_hour: z.number().min(0), gpu_hour: z.number().min(0) }),
})
export type PriceTable = z.infer<typeof PriceTable>

export const DEFAULT_PRICES: PriceTable = {
  currency: 'USD',
  aws: { cpu_hour: 0.048, gpu_hour: 0.9 },
  user: { cpu_hour: 0.02, gpu_hour: 0.35 },
}

const US_PER_HOUR = 3_600_000_000

/** The estimated cost of usage (whole microseconds of CPU and GPU) on one instance type, rounded to 1/10,000 of the currency. */
export function costOf(prices: PriceTable, instanceType: string, usage: { cpu_us: number; gpu_us: number }): number {
  const price = instanceType === 'user' ? prices.user : prices.aws
  return round4((usage.cpu_us / US_PER_HOUR) * price.cpu_hour + (usage.gpu_us / US_PER_HOUR) * price.gpu_hour)
}

export const round4 = (n: number) => Math.round(n * 10_000) / 10_000
